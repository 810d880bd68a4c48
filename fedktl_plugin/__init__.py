"""FedKTL (Zhang et al., CVPR 2024) as an htfl plugin."""
