"""The autotuner: measurers, search space, Optuna studies and storages, the tuning loop.

Constants the command line needs without importing optuna live here.
"""

DEFAULT_HEARTBEAT_S = 10  # database storages: seconds between a running trial's heartbeats
