"""Studies: thin modules that build inputs, call `qktrace`, and write a store and its figures.

`STUDIES` maps the name used on the command line to the module that implements it; each module
has a ``run(out, ...)`` function. Add a study by adding its module here.
"""

STUDIES: dict[str, str] = {
    "toy": "qktrace.studies.toy",
    # language-model studies: ``run(model, *, out, heads, n_prompts, ...)``, `qktrace study NAME`
    "filter-heads": "qktrace.studies.filter_heads",
    "order-id": "qktrace.studies.order_id",
    "lexical": "qktrace.studies.lexical",
}
