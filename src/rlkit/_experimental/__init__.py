"""Unproven ideas: correct on the CPU, not yet measured where they should pay off; stable code never imports them."""
