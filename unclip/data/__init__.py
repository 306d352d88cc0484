"""Shard writing and checking, the webdataset read pipeline, demo data and DataModules."""
