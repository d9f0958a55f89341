"""One way to read and write any URI: local folders, S3, http(s) with its address rules."""
