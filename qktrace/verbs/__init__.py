"""The public verbs, one module each: capture, reduce, decompose, intervene, answers,
attribute, find_heads, evaluate.
"""
