"""rlhf-chat's library: feedback records, datasets, reward model, PPO, registry, serving.

Imports neither gradio nor celery, so UI replicas and training workers can live on
different machines and both use it.
"""

import os

# The UI and a training worker share the cores of one machine (`rlhf-chat up`). With
# OpenMP's default busy-waiting, two torch processes on 2 cores starve each other:
# measured here, SmolLM2 generation fell from 5-7 tokens/s (PASSIVE) to 1 token/s
# while another torch process ran. Must be set before torch is first imported;
# setdefault leaves a person's own choice alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
