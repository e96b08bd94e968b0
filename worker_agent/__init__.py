"""The library embedded in every engine rank.

An engine uses `WorkerAgent` (start, at_boundary, stop, and on_step_failed when
a collective of its step raised) and implements `EngineAdapter` for the agent to
execute the coordinator's commands. Import them from `worker_agent.agent` and
`worker_agent.adapter`.
"""
