"""Celery workers that turn feedback into new policy versions (see worker.celery_app).

Start one with ``python -m worker`` or ``rlhf-chat worker``; the work itself is
in ``rlhf_core.rounds``.
"""
