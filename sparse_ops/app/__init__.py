"""The application: command line, fine-tuning loop, data and model loading, demo."""
