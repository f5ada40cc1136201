"""The foundations, which import nothing else of capsdist: the user-facing errors (errors), durable file writing
(files), the CPU thread budget (threads) and what the launch scripts share (cli)."""
