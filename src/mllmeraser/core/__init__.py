"""The method: steering equations, hooks, the eraser artifact, fitting, model families and loading."""
