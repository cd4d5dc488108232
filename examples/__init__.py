"""An example ebsqs app: tasks in examples.tasks, a demo runner in examples.run."""
