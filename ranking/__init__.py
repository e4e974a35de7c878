"""What training and inference share: candidates, the ranking frame, scoring, the model registry."""
