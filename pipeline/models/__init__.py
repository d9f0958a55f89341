"""Model profiles: what each edit model accepts and how it answers, shared like `spec`."""
