"""Legacy lmms-eval plugin layout: `<plugin>.tasks`, a directory lmms-eval adds to its task
include path (`LMMS_EVAL_PLUGINS=...` requires it). No tasks of our own: lmms-eval's tasks, or
`--include_path DIR` for local ones, are used as they are."""
