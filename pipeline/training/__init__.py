"""Training: one loop engine (epochs, seeding, checkpoint, resume, history) under the
incremental trainer, the joint trainer and the pool scheduler that CWPS needs."""
