"""bastion.verify (built in later issues)."""
