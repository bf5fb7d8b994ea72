"""Token shards (data.format=shards): the files on disk, the task=tokenize writer, and the loader a run opens.

store (the shard and index files, and blocks read from them through memory maps), tokenize (documents ->
shards, resumable) and load (a run's shards opened and checked against its settings). Importing the package
imports nothing.
"""
