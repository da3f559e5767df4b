"""NDIF 0.1.2's model actor, on CPU: imported by the local NDIF server only (its own venv).

NDIF loads its model actor class from NDIF_DEFAULT_MODEL_ACTOR_CLASS (its extension point); the
stock `BaseModelDeployment` assumes a GPU in exactly two methods, which this replaces. Everything
else (running, uploading results, timeouts, cancelling) is NDIF's own code.
"""

import gc

import ray
from ndif.services.ray.deployments.modeling.base import BaseModelDeployment
from nnsight.modeling.huggingface import HuggingFaceModel


class CPUModelDeployment(BaseModelDeployment):
    # not cacheable: caching parks weights between GPU and CPU (to_cache/from_cache), GPU-only
    CACHEABLE = False

    def load_from_disk(self) -> HuggingFaceModel:
        # the stock one pins a CUDA device and checks that every weight landed on it
        model = HuggingFaceModel.from_model_key(
            self.model_key, dispatch=True, dtype=self.dtype_name, **self.kwargs
        )
        model._module.requires_grad_(False)
        return model

    def cleanup(self) -> None:
        # the stock one calls torch.cuda.synchronize(), which a CPU-only torch refuses
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


@ray.remote(num_cpus=1, max_restarts=-1)
class CPUModelActor(CPUModelDeployment):
    pass
