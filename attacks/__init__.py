"""Audit: attacks as plain functions, BPDA/EOT wrappers, metrics, the audit runner and its report."""
