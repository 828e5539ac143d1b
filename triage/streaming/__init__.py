"""Streaming triage: images analysed as they arrive, before their study is complete.

A model whose manifest sets ``preprocessing.streaming`` (one image at a time, reduced by
maximum) scores each image on its own, so the score of an image never depends on the others
and a part of a series that is positive stays positive when the series is complete.

- ``dispatch``: the leading watcher groups the images it sees arrive into small batches per
  series and queues them on the ``stream`` queue (never while an analysis of a complete study
  waits, and never more than a few batches at once: under load the work is left to the
  analysis at stability instead of building a backlog).
- ``arrivals``: a worker scores a batch, keeps each image's scores in the score cache
  (``cache``), and the moment a series crosses a threshold raises the study on the worklist
  with a preliminary reason, a live event and the webhooks that ask for preliminary results.
- ``final``: the analysis at stability takes the scores of the images already seen from the
  cache and computes only the others, then writes the SR and the result as before.
"""
