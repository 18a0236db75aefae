"""bastion.defenses (built in later issues)."""
