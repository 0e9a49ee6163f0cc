"""Other SP implementations through the same harness: adapters and their verdicts (pass / wrong / refused)."""
