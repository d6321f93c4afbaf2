"""Quality-benchmark suites: each module defines `experiments(args) -> list[Experiment]`."""

SUITES = ("baselines", "dgenctr", "gsvr", "dmae", "scenario_wise_rec", "sparse_scenarios")
