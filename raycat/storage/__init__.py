"""Where bytes live: run dirs on local disk or object storage, row keys, model directories."""
