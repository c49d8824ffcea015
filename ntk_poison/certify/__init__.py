"""Certified bounds on poisoning (placeholder docstring; the real package file is merged from the kernel branch)."""
