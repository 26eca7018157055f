"""Dataset tools: ``python -m data_tools {convert,validate,stats,synth} ...`` (``--help`` on each).

They reuse prefopt's own readers and row checks (:mod:`prefopt.data`), so a file that ``validate`` accepts is a file
the trainer accepts. Bad input ends with exit status 2 and one message naming the file, line and field.
"""
