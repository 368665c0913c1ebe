"""The report: collect rows from bundles, render HTML/Markdown and charts."""
