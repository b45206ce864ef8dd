"""Output formats: HF MoE families (`hf_moe`) and moeconv's own format (`native`)."""
