"""Studies: the Study spec and run_study, the in-trace strategies (projected, paired), the
head search, analysis, figures and the summary.
"""
