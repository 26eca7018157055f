"""Iterated preference optimisation (DNO): sample, score, build pairs, train against the previous iterate."""
