"""Everything that touches vLLM: registration, model classes, CLI flags, runtime patches,
start-up validation, CPU kept-head attention, Ray on CPU and the version adapter."""
