"""The bundled demo data set and the script that generates it."""
