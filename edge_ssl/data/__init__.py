"""Images in and out: sources, streaming, shards, batches, views, corruptions."""
