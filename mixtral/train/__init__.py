"""Training: pretraining with MoE load balancing, SFT, DPO and LoRA, as explicit loops."""
