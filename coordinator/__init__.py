"""The ep-recovery coordinator daemon."""
