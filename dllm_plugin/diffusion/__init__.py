"""Masked-diffusion math: schedules, noise, loss weights and normalisation, the chunked
head, and the masked-position scorer the trainers run."""
