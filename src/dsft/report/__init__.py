"""Shared report helpers for every stage: plots (matplotlib, CJK fonts), number formatting, Markdown/HTML rendering."""
