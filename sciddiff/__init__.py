"""sciddiff"""
