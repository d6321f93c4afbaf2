"""KFP pipelines: training (validate → features → train → register → gated deploy) and monitoring (drift)."""
