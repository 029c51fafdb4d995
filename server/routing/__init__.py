"""A/B routes: weighted variants with sticky bucketing, shadow traffic, the route store and its file, feedback
statistics and the A/B statistics math. Nothing here knows gRPC or tensors; the API layer calls :class:`Router`."""
