"""Parallelism: partitioners (mesh, placement, compilation), multi-process
start-up (:mod:`.distributed`) and agreed preemption (:mod:`.preemption`)."""
