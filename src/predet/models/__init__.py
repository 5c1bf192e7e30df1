"""Model pieces of PreDet: backbone + FPN, weak-label head, CRPN, contrastive RoI head."""
