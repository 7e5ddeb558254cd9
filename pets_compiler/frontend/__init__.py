"""Checkpoint and task loading: base model, task sources (native, peft, fine-tunes), validation, TaskSet."""
