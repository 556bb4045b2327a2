"""Server strategies: each configures a round and aggregates; the loop lives in ``fleet.runner``."""
