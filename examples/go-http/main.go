// An HTTP server for unik's language tests: /ping_test, /env_test (env KEY), /mount_test (/data/data.txt).
package main

import (
	"fmt"
	"net/http"
	"os"
)

func main() {
	port := os.Getenv("PORT")
	if port == "" {
		port = "8080"
	}
	http.HandleFunc("/ping_test", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"message":"pong"}`)
	})
	http.HandleFunc("/env_test", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, os.Getenv("KEY"))
	})
	http.HandleFunc("/mount_test", func(w http.ResponseWriter, r *http.Request) {
		data, err := os.ReadFile("/data/data.txt")
		if err != nil {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprint(w, `{"message":"/data/data.txt not found"}`)
			return
		}
		w.Write(data)
	})
	fmt.Printf("go-http: listening on :%s\n", port)
	if err := http.ListenAndServe(":"+port, nil); err != nil {
		fmt.Fprintln(os.Stderr, "go-http:", err)
		os.Exit(1)
	}
}
