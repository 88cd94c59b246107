"""One try of a generation task: the run engine (:mod:`.engine`) and what it produced (:mod:`.outcome`)."""
