"""The sans-I/O core: keys, admission plans, script arguments, replies and decisions."""
