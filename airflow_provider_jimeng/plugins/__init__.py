"""Airflow plugins the provider registers (Airflow 3.1 and later): the task instance's image gallery."""
