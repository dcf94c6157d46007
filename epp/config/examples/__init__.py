"""Example EndpointPickerConfig files shipped as package data."""
