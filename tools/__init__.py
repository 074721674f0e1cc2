"""Analysis scripts that run alone on a saved run of emaq_offline.py or on a dataset (one script per analysis)."""
