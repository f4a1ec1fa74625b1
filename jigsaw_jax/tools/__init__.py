"""Command-line tools: memory plans for a mesh (`plan`) and a check that sharded training
matches one device (`scale_check`)."""
