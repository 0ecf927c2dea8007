"""The process model of ``database-service serve``: ``DBSVC_WORKERS`` serving processes under
one supervisor.

- ``plan``: how many workers, and each one's share of the connection caps.
- ``supervisor``: the supervisor's side (start, watch and replace, stop the workers).
- ``runtime``: a worker's side (its identity, its snapshot for the others, what it reads of
  theirs and of the supervisor's).

With one worker, ``serve`` is a single process and none of this runs.
"""
