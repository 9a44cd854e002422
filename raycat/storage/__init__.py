"""Where bytes live: run dirs on local disk or object storage (and Parquet read as a Ray Dataset on the
workers), row keys, model directories."""
